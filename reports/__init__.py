"""paraplan's reports: strategies compared in tables and pictures (issue 6; not built yet)."""
