//! `rund-guest-probe`: what the device tests run inside the guest, beside busybox: checked vsock
//! streams ([`rund_tests::stream`]) in either direction, forged file handles against a virtio-fs
//! mount, and the benchmarks' guest side. Each step prints one `RUND-PROBE <what> ok|FAIL ...`
//! line for the host to read.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::thread;

use clap::{Parser, Subcommand};
use rund_tests::devbench::{self, Figure};
use rund_tests::stream;
use vsock::{VsockAddr, VsockListener, VsockStream};

#[derive(Parser)]
#[command(about = "rund's in-guest test probe")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Accepts `count` vsock streams on `port` and checks each.
    StreamServe {
        #[arg(long)]
        port: u32,
        #[arg(long)]
        count: usize,
    },
    /// Opens `count` streams to `cid`:`port` at once, each sending `bytes`.
    StreamConnect {
        #[arg(long, default_value_t = 2)]
        cid: u32,
        #[arg(long)]
        port: u32,
        #[arg(long)]
        count: usize,
        #[arg(long)]
        bytes: u64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Opens forged file handles on the mount holding `dir` (nodeids 1..=`max_nodeid`) and checks
    /// that nothing opened holds `secret`.
    FsHandles {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        secret: String,
        #[arg(long, default_value_t = 256)]
        max_nodeid: u64,
    },
    /// The benchmarks' guest side, on vsock `port`, one request per connection, until `QUIT`:
    /// the stream benchmarks (`SINK`, `SOURCE <n>`, `ECHO`), or `RUN <benchmark>` (the words of a
    /// [`BenchKind`] command line), answered with one `RUND-BENCH <name> <value> <unit>` line or
    /// an `ERROR <why>` line.
    BenchAgent {
        #[arg(long)]
        port: u32,
    },
}

/// One `RUN` request of the bench agent.
#[derive(Parser)]
#[command(no_binary_name = true)]
struct BenchLine {
    /// The name printed with the figure.
    #[arg(long)]
    name: String,
    #[command(subcommand)]
    what: BenchKind,
}

#[derive(Subcommand)]
enum BenchKind {
    /// Sequential read of one file (MB/s).
    ReadFile {
        path: PathBuf,
        /// Drop the page cache first, so that the file comes through the filesystem's device.
        #[arg(long)]
        drop_caches: bool,
    },
    /// Open, read and close of every file in a directory (files/s).
    ReadTree {
        dir: PathBuf,
        /// Drop the page, dentry and inode caches first.
        #[arg(long)]
        drop_caches: bool,
    },
    /// O_DIRECT sequential I/O of `bytes` in 1 MiB blocks (MB/s).
    Sequential {
        path: PathBuf,
        #[arg(long)]
        bytes: u64,
        #[arg(long)]
        write: bool,
    },
    /// O_DIRECT random 4 KiB reads over the first `span` bytes (IOPS).
    RandomReads {
        path: PathBuf,
        #[arg(long)]
        span: u64,
        #[arg(long)]
        ops: u64,
    },
}

fn main() -> ExitCode {
    let ok = match Cli::parse().command {
        Command::StreamServe { port, count } => stream_serve(port, count),
        Command::StreamConnect {
            cid,
            port,
            count,
            bytes,
            seed,
        } => stream_connect(cid, port, count, bytes, seed),
        Command::FsHandles {
            dir,
            secret,
            max_nodeid,
        } => fs_handles(&dir, &secret, max_nodeid),
        Command::BenchAgent { port } => bench_agent(port),
    };
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn bench_agent(port: u32) -> bool {
    let listener = match VsockListener::bind(&VsockAddr::new(libc::VMADDR_CID_ANY, port)) {
        Ok(l) => l,
        Err(e) => {
            println!("RUND-PROBE bench-agent FAIL cannot listen on port {port}: {e}");
            return false;
        }
    };
    println!("RUND-PROBE bench-agent listening port={port}");
    loop {
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) => {
                println!("RUND-PROBE bench-agent FAIL accept: {e}");
                return false;
            }
        };
        let mut r = BufReader::new(stream);
        let mut line = String::new();
        if let Err(e) = r.read_line(&mut line) {
            println!("RUND-PROBE bench-agent FAIL reading a request: {e}");
            return false;
        }
        let served = match line.trim().split_once(' ') {
            _ if line.trim() == "QUIT" => return writeln!(r.get_mut(), "ok").is_ok(),
            Some(("RUN", args)) => {
                let answer = run_bench(args).unwrap_or_else(|e| format!("ERROR {e}"));
                writeln!(r.get_mut(), "{answer}")
            }
            _ => devbench::serve_request(&line, r),
        };
        if let Err(e) = served {
            println!("RUND-PROBE bench-agent FAIL {}: {e}", line.trim());
            return false;
        }
    }
}

/// Runs the benchmark named by the words of `args`; returns its figure line.
fn run_bench(args: &str) -> Result<String, String> {
    let BenchLine { name, what } =
        BenchLine::try_parse_from(args.split_whitespace()).map_err(|e| e.to_string())?;
    let drop_caches = |yes: bool| -> std::io::Result<()> {
        if yes {
            // Written-back pages, then the clean page cache, dentries and inodes.
            sync_filesystems();
            std::fs::write("/proc/sys/vm/drop_caches", "3")?;
        }
        Ok(())
    };
    let (value, unit) = match what {
        BenchKind::ReadFile {
            path,
            drop_caches: d,
        } => (
            drop_caches(d).and_then(|()| devbench::read_file(&path)),
            "MB/s",
        ),
        BenchKind::ReadTree {
            dir,
            drop_caches: d,
        } => (
            drop_caches(d).and_then(|()| devbench::read_tree(&dir)),
            "files/s",
        ),
        BenchKind::Sequential { path, bytes, write } => {
            (devbench::sequential_direct(&path, bytes, write), "MB/s")
        }
        BenchKind::RandomReads { path, span, ops } => {
            (devbench::random_reads_direct(&path, span, ops), "IOPS")
        }
    };
    let value = value.map_err(|e| format!("{name}: {e}"))?;
    Ok(Figure { name, value, unit }.to_string())
}

/// sync(2): what drop_caches cannot drop until it is on disk.
fn sync_filesystems() {
    // SAFETY: sync takes no arguments and cannot fail.
    unsafe { libc::sync() };
}

fn shutdown_write(s: &VsockStream) -> std::io::Result<()> {
    s.shutdown(std::net::Shutdown::Write)
}

fn stream_serve(port: u32, count: usize) -> bool {
    let listener = match VsockListener::bind(&VsockAddr::new(libc::VMADDR_CID_ANY, port)) {
        Ok(l) => l,
        Err(e) => {
            println!("RUND-PROBE stream-serve FAIL cannot listen on port {port}: {e}");
            return false;
        }
    };
    println!("RUND-PROBE stream-serve listening port={port}");
    let mut workers = Vec::new();
    for _ in 0..count {
        match listener.accept() {
            Ok((s, peer)) => workers.push(thread::spawn(move || {
                match stream::acceptor(s, shutdown_write) {
                    Ok((bytes, digest)) => {
                        println!(
                            "RUND-PROBE stream-in ok from={peer:?} bytes={bytes} sha256={digest}"
                        );
                        true
                    }
                    Err(e) => {
                        println!("RUND-PROBE stream-in FAIL from={peer:?}: {e}");
                        false
                    }
                }
            })),
            Err(e) => {
                println!("RUND-PROBE stream-serve FAIL accept: {e}");
                return false;
            }
        }
    }
    workers.into_iter().all(|w| w.join().unwrap_or(false))
}

fn stream_connect(cid: u32, port: u32, count: usize, bytes: u64, seed: u64) -> bool {
    let workers: Vec<_> = (0..count as u64)
        .map(|i| {
            thread::spawn(move || {
                let s = match VsockStream::connect(&VsockAddr::new(cid, port)) {
                    Ok(s) => s,
                    Err(e) => {
                        println!("RUND-PROBE stream-out FAIL connect {cid}:{port}: {e}");
                        return false;
                    }
                };
                match stream::connector(s, shutdown_write, seed + i, bytes) {
                    Ok(digest) => {
                        println!("RUND-PROBE stream-out ok bytes={bytes} sha256={digest}");
                        true
                    }
                    Err(e) => {
                        println!("RUND-PROBE stream-out FAIL: {e}");
                        false
                    }
                }
            })
        })
        .collect();
    workers.into_iter().all(|w| w.join().unwrap_or(false))
}

/// `struct file_handle` with room for the handle bytes (MAX_HANDLE_SZ is 128).
#[repr(C)]
struct FileHandle {
    handle_bytes: u32,
    handle_type: i32,
    f_handle: [u8; 128],
}

fn name_to_handle(path: &Path) -> std::io::Result<FileHandle> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())?;
    let mut h = FileHandle {
        handle_bytes: 128,
        handle_type: 0,
        f_handle: [0; 128],
    };
    let mut mount_id: libc::c_int = 0;
    // SAFETY: the path is NUL-terminated, `h` is a file_handle with handle_bytes set to the room
    // after its header, and mount_id is a valid int; the kernel writes only within them.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_name_to_handle_at,
            libc::AT_FDCWD,
            c.as_ptr(),
            &mut h as *mut FileHandle,
            &mut mount_id as *mut libc::c_int,
            0,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(h)
}

fn open_by_handle(
    mount: &std::fs::File,
    h: &FileHandle,
    flags: i32,
) -> std::io::Result<std::fs::File> {
    // SAFETY: `h` is a complete file_handle whose handle_bytes is within its buffer; the kernel only
    // reads it. A returned descriptor is new and owned by the File.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_by_handle_at,
            mount.as_raw_fd(),
            h as *const FileHandle,
            flags,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the descriptor was just returned to us and nothing else owns it.
    Ok(unsafe { std::os::fd::FromRawFd::from_raw_fd(fd as i32) })
}

/// Forges FUSE handles (nodeid, generation) for every nodeid up to `max_nodeid` and opens each;
/// whatever opens must not hold the secret that sits outside the share.
fn fs_handles(dir: &Path, secret: &str, max_nodeid: u64) -> bool {
    let template = match name_to_handle(dir) {
        Ok(h) => h,
        Err(e) => {
            println!(
                "RUND-PROBE fs-handles FAIL name_to_handle_at {}: {e}",
                dir.display()
            );
            return false;
        }
    };
    let mount = match std::fs::File::open(dir) {
        Ok(f) => f,
        Err(e) => {
            println!("RUND-PROBE fs-handles FAIL open {}: {e}", dir.display());
            return false;
        }
    };
    // The FUSE handle (fs/fuse/inode.c, fuse_encode_fh): u32 words nodeid-high, nodeid-low,
    // generation; a directory's parent words follow and are left as they are.
    if template.handle_bytes < 12 {
        println!(
            "RUND-PROBE fs-handles FAIL {}-byte handle of type {:#x} is not a FUSE handle",
            template.handle_bytes, template.handle_type
        );
        return false;
    }
    let mut opened = 0u64;
    let mut leaked = Vec::new();
    // Every small nodeid (the guest's own inodes among them) and a few far ones no server gave out.
    let far = [1 << 20, 1 << 32, (1 << 63) + 1, u64::MAX];
    for nodeid in (1..=max_nodeid).chain(far) {
        for generation in [0u32, 1] {
            let mut h = FileHandle {
                handle_bytes: template.handle_bytes,
                handle_type: template.handle_type,
                f_handle: template.f_handle,
            };
            h.f_handle[0..4].copy_from_slice(&((nodeid >> 32) as u32).to_ne_bytes());
            h.f_handle[4..8].copy_from_slice(&(nodeid as u32).to_ne_bytes());
            h.f_handle[8..12].copy_from_slice(&generation.to_ne_bytes());
            if std::env::var_os("RUND_PROBE_VERBOSE").is_some() {
                eprintln!("fs-handles: nodeid {nodeid} generation {generation}");
            }
            let Ok(mut f) = open_by_handle(&mount, &h, libc::O_RDONLY) else {
                continue;
            };
            opened += 1;
            let mut content = Vec::new();
            // A directory fails to read; its entries are checked below.
            let _ = (&mut f).take(1 << 20).read_to_end(&mut content);
            if String::from_utf8_lossy(&content).contains(secret) {
                leaked.push(format!("nodeid {nodeid} file"));
            }
            // A directory: only its names are checked (its files are reached by their own
            // nodeids); the secret's name exists only outside the share.
            let fd_path = format!("/proc/self/fd/{}", f.as_raw_fd());
            if let Ok(entries) = std::fs::read_dir(&fd_path) {
                if entries.flatten().any(|e| e.file_name() == "secret") {
                    leaked.push(format!("nodeid {nodeid} lists the outside directory"));
                }
            }
        }
    }
    if leaked.is_empty() {
        println!(
            "RUND-PROBE fs-handles ok type={:#x} bytes={} opened={opened} of {} forged",
            template.handle_type,
            template.handle_bytes,
            (max_nodeid + far.len() as u64) * 2
        );
        true
    } else {
        println!(
            "RUND-PROBE fs-handles FAIL secret reached: {}",
            leaked.join(", ")
        );
        false
    }
}
