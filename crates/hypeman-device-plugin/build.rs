//! Generates the kubelet's gRPC APIs from the .proto files in proto/ (needs
//! `protoc`: Debian's protobuf-compiler).
fn main() -> Result<(), Box<dyn std::error::Error>> {
    tonic_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_protos(
            &[
                "proto/deviceplugin/v1beta1/api.proto",
                "proto/podresources/v1/api.proto",
            ],
            &["proto"],
        )?;
    Ok(())
}
