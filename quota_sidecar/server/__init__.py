"""The gRPC side: the app, servicers (the only server modules touching generated protobuf), auth, settings, workers, observability."""
