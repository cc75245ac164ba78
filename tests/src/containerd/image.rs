//! The test images, built locally (no registry is reachable): a busybox image (busybox-static
//! with its applet symlinks) and a pause image (the same layer; its entrypoint waits for SIGTERM
//! or SIGINT and exits 0), each also without `Env`, as four tags of one OCI layout made with
//! `umoci`, archived with `tar` for `ctr image import`.

use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The statically linked busybox the image is made of (Debian's `busybox-static`).
pub const BUSYBOX: &str = "/bin/busybox";
/// What `ctr image import --base-name` prefixes to the layout's tags.
pub const IMAGE_BASE_NAME: &str = "rund.test/e2e";
/// The busybox image: `sh` by default, PATH set.
pub const BUSYBOX_IMAGE: &str = "rund.test/e2e:busybox";
/// The pause image: containerd's CRI `sandbox_image` in the harness's own configuration.
pub const PAUSE_IMAGE: &str = "rund.test/e2e:pause";
/// The busybox image without `Env` (no `PATH`), as images built FROM scratch often are.
pub const BUSYBOX_NOENV_IMAGE: &str = "rund.test/e2e:busybox-noenv";
/// The pause image without `Env` and with an absolute entrypoint (as `registry.k8s.io/pause` is
/// built): what a node's containerd starts pods from (the harness tags it with the name the
/// node's configuration expects).
pub const PAUSE_NOENV_IMAGE: &str = "rund.test/e2e:pause-noenv";
/// A file of the image layer, and its content: tests check that writes in a container never
/// change it on the host.
pub const IMAGE_FILE: &str = "etc/image-file";
pub const IMAGE_FILE_CONTENT: &str = "from-the-image\n";

/// The pause process: waits (in short sleeps, so that a signal is handled at once) and exits 0
/// on SIGTERM or SIGINT. As PID 1 of its PID namespace it must handle them itself.
const PAUSE_SCRIPT: &str = "trap 'exit 0' TERM INT; while :; do /bin/sleep 3600 & wait $!; done";
const IMAGE_PATH_ENV: &str = "PATH=/usr/sbin:/usr/bin:/sbin:/bin";

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("preparing the image root {path}: {source}")]
    Root {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot run {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("{command} failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
}

/// What [`build`] made.
#[derive(Clone, Debug)]
pub struct Images {
    /// The image root as a plain directory (also usable as a bundle's rootfs).
    pub rootfs: PathBuf,
    /// The OCI layout archive for `ctr image import --base-name IMAGE_BASE_NAME`.
    pub archive: PathBuf,
}

fn run(program: &str, args: &[&str]) -> Result<(), ImageError> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|source| ImageError::Spawn {
            program: program.into(),
            source,
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(ImageError::Failed {
            command: format!("{program} {}", args.join(" ")),
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// Writes the image root under `root`: busybox and its applets in /bin, the directories a
/// container needs, root's passwd and group entries and [`IMAGE_FILE`].
pub fn image_root(root: &Path) -> Result<(), ImageError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ImageError::Root { path, source }
    };
    for d in ["bin", "dev", "etc", "proc", "root", "sys", "tmp"] {
        std::fs::create_dir_all(root.join(d)).map_err(io(&root.join(d)))?;
    }
    std::fs::set_permissions(root.join("tmp"), std::fs::Permissions::from_mode(0o1777))
        .map_err(io(&root.join("tmp")))?;
    let busybox = root.join("bin/busybox");
    std::fs::copy(BUSYBOX, &busybox).map_err(io(&busybox))?;
    let list = Command::new(BUSYBOX)
        .arg("--list")
        .output()
        .map_err(|source| ImageError::Spawn {
            program: BUSYBOX.into(),
            source,
        })?;
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet != "busybox" && !applet.contains('/') {
            let link = root.join("bin").join(applet);
            symlink("busybox", &link).map_err(io(&link))?;
        }
    }
    for (file, content) in [
        ("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n"),
        ("etc/group", "root:x:0:\n"),
        (IMAGE_FILE, IMAGE_FILE_CONTENT),
    ] {
        std::fs::write(root.join(file), content).map_err(io(&root.join(file)))?;
    }
    Ok(())
}

/// Builds the images (four tags of one layer) under `dir` (which must exist and be empty).
pub fn build(dir: &Path) -> Result<Images, ImageError> {
    let rootfs = dir.join("rootfs");
    image_root(&rootfs)?;
    let layout = dir.join("layout");
    let layout_s = layout.to_string_lossy().into_owned();
    let busybox = format!("{layout_s}:busybox");
    let root_s = rootfs.to_string_lossy().into_owned();
    run("umoci", &["init", "--layout", &layout_s])?;
    run("umoci", &["new", "--image", &busybox])?;
    run("umoci", &["insert", "--image", &busybox, &root_s, "/"])?;
    run(
        "umoci",
        &[
            "config",
            "--image",
            &busybox,
            "--config.env",
            IMAGE_PATH_ENV,
            "--config.workingdir",
            "/",
            "--config.cmd",
            "sh",
        ],
    )?;
    run(
        "umoci",
        &[
            "config",
            "--image",
            &busybox,
            "--tag",
            "pause",
            "--clear=config.cmd",
            "--config.entrypoint",
            "/bin/sh",
            "--config.entrypoint",
            "-c",
            "--config.entrypoint",
            PAUSE_SCRIPT,
        ],
    )?;
    for (from, tag) in [("busybox", "busybox-noenv"), ("pause", "pause-noenv")] {
        run(
            "umoci",
            &[
                "config",
                "--image",
                &format!("{layout_s}:{from}"),
                "--tag",
                tag,
                "--clear=config.env",
            ],
        )?;
    }
    run("umoci", &["gc", "--layout", &layout_s])?;
    let archive = dir.join("images.tar");
    run(
        "tar",
        &["-C", &layout_s, "-cf", &archive.to_string_lossy(), "."],
    )?;
    Ok(Images { rootfs, archive })
}
