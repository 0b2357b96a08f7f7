"""Identities: what the predictor makes of photos (`HyperLoRAIdentity`), how inputs are resolved to one, the
features interface the encoders implement, and the cache of prepared identities."""
