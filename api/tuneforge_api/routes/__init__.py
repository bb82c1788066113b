"""Route modules: thin; the logic lives in store/ and the services."""
