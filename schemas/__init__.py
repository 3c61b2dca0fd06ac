"""Package data: the JSON Schema of the config file (installed as ``facecore_schemas``)."""
