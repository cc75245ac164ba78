//! Times copies of the writable layer's base image: `image-copy DIR SIZE_MIB [N]`. Makes the
//! base image in DIR if missing, then N copies (default 3) beside it, printing how each was made,
//! how long it took and the blocks it holds, and removes them. No root needed. For figures
//! (reflink against sparse copy), not a test.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::Instant;

use rootfs_split::WritableLayer;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: image-copy DIR SIZE_MIB [N]";
    let dir = PathBuf::from(args.next().ok_or(usage)?);
    let size_mib: u64 = args.next().ok_or(usage)?.parse()?;
    let n: usize = args.next().map_or(Ok(3), |s| s.parse())?;
    let layer = WritableLayer::new(&dir, size_mib)?;
    let t = Instant::now();
    let made = layer.ensure_base_image()?;
    let base = std::fs::metadata(layer.base_image_path())?;
    println!(
        "base {}: {made:?} in {:?}, {} KiB allocated",
        layer.base_image_path().display(),
        t.elapsed(),
        base.blocks() / 2
    );
    for i in 0..n {
        let dest = dir.join(format!("image-copy-{i}.ext4"));
        let t = Instant::now();
        let method = layer.copy_base_image(&dest)?;
        let took = t.elapsed();
        let blocks = std::fs::metadata(&dest)?.blocks();
        println!(
            "copy {i}: {method:?} in {took:?}, {} KiB allocated",
            blocks / 2
        );
        std::fs::remove_file(&dest)?;
    }
    Ok(())
}
