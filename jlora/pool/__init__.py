"""Device pools and their host-side managers."""
