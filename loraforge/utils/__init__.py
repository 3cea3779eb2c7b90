"""Bottom-level helpers: atomic file writes, output-folder policy, transformers compatibility."""
