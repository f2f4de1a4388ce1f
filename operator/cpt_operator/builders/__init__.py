"""Pure builders: ContinualPretrain spec → stage configs → child manifests (dicts). No I/O."""
