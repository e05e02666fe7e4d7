"""Generated protobuf and gRPC code for package meterd.v1 (see proto/)."""
