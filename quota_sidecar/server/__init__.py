"""The gRPC side: the app, the servicers (the only server modules touching generated protobuf),
auth, settings, workers, observability."""
