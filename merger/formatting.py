"""Numbers as people read them."""


def human_size(n: int) -> str:
    """Bytes in decimal units: 536.2 MB."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)
