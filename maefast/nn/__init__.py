"""Drop-in modules with the official/timm constructor arguments and state-dict keys."""
