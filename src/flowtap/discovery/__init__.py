"""Program start: executables classified and probed before they run (docs/program-start.md)."""
