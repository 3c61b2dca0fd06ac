"""Data formats and tools: RecordIO, .bin pair sets, image decoding, packing, synthetic identities."""
