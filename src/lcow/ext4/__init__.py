"""ext4: on-disk format, a streaming writer of compact read-only images, and a reader."""
