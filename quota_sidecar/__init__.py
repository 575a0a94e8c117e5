"""quota-sidecar: a gRPC quota sidecar for AI generation workers, backed by Redis."""
