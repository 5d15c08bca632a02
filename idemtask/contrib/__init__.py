"""Optional integrations, each importing its third-party package only when used."""
