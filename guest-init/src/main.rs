fn main() {
    eprintln!("guest-init: not implemented yet");
    std::process::exit(1);
}
