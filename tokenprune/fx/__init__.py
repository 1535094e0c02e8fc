"""Graph work: tracing, chain discovery and rewriting. Imports no training code."""
