"""The embedded default: tiny but real diffusers pipelines that are built offline, in code."""
