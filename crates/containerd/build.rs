//! Generates the CRI image-service client from `proto/cri`.

fn main() -> std::io::Result<()> {
    println!("cargo:rerun-if-changed=../../proto/cri");
    tonic_prost_build::configure()
        .build_server(false)
        .compile_protos(
            &["../../proto/cri/runtime/v1/images.proto"],
            &["../../proto/cri"],
        )
}
