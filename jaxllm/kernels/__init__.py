"""Fast paths. Each kernel has a plain-XLA reference with the same signature;
`ModelConfig.kernels` selects between them ("xla" or "pallas")."""
