//! Builds (or finds) the sandbox base image in the folder given.
fn main() {
    let dir = std::env::args()
        .nth(1)
        .expect("usage: sandbox_base IMAGES_DIR");
    let started = std::time::Instant::now();
    match hearth_image::base::ensure(std::path::Path::new(&dir)) {
        Ok(path) => println!("{} ({:?})", path.display(), started.elapsed()),
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
    }
}
