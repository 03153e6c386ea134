"""torch.compile backends. ``dsa`` is found through the ``torch_dynamo_backends`` entry point."""
