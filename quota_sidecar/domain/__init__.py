"""The rules: plans, pricing, windows, the engine and its ports.

Pure Python, clock injected; no grpc, protobuf or redis."""
