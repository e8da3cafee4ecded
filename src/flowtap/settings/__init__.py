"""Settings: one declaration of each, and where its value came from."""
