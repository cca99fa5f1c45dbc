//! `cargo run -p hearth-image --example bake -- IMAGES_DIR NAME AGENT_BINARY
//! CACHE_DIR [--rootfs minimal|debian] [--kernel PATH]`: bakes an image and
//! prints its folder (a stand-in for `hearth image bake` until the CLI has
//! it).

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: bake IMAGES_DIR NAME AGENT_BINARY CACHE_DIR [--rootfs minimal|debian] [--kernel PATH]";
    let [images, name, agent, cache, rest @ ..] = args.as_slice() else {
        eprintln!("{usage}");
        return std::process::ExitCode::from(2);
    };
    let mut opts = hearth_image::BakeOptions::new(images, name, agent, cache);
    for pair in rest.chunks(2) {
        match pair {
            [flag, value] if flag == "--kernel" => opts.kernel = Some(value.into()),
            [flag, value] if flag == "--rootfs" => match value.parse() {
                Ok(kind) => opts.rootfs = kind,
                Err(e) => {
                    eprintln!("{e}");
                    return std::process::ExitCode::from(2);
                }
            },
            _ => {
                eprintln!("{usage}");
                return std::process::ExitCode::from(2);
            }
        }
    }
    match hearth_image::bake(&opts, |m| eprintln!("bake: {m}")) {
        Ok(image) => {
            println!("{}", image.dir.display());
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("bake failed: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
