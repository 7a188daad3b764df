"""Models: pure nn.Modules, one per file, each with a frozen config dataclass saved as JSON beside its weights."""
