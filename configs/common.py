"""Helpers shared by experiment configs."""

import ml_collections


def parse_arg(arg: str | None, lazy: bool = False, **spec) -> ml_collections.ConfigDict:
    """Parses `"variant=1.3b,runlocal=True"` into a ConfigDict, typed by the defaults in `spec`.

    A bare word `foo` means `foo=True`. Unknown keys fail unless `lazy`.
    """
    out = ml_collections.ConfigDict(dict(spec))
    if not arg:
        return out
    for item in arg.split(","):
        if not item:
            continue
        key, _, value = item.partition("=")
        if key not in spec:
            if not lazy:
                raise ValueError(f"unknown config arg {key!r}; known: {sorted(spec)}")
            out[key] = value if value else True
            continue
        default = spec[key]
        if not value:
            out[key] = True
        elif isinstance(default, bool):
            out[key] = value.lower() in ("1", "true", "yes", "y")
        elif isinstance(default, int):
            out[key] = int(value)
        elif isinstance(default, float):
            out[key] = float(value)
        else:
            out[key] = value
    return out
