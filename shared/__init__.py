"""Code shared by the API and the workers: settings, state, drivers, address pool."""
