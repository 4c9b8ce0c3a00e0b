"""A one-line progress bar for management commands."""


def progress_bar(done: int, total: int, label: str, width: int = 30) -> str:
    """``\\rlabel [#####.....] done/total``: write it without a newline to redraw in place."""
    filled = width * done // total if total else width
    return f"\r{label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}"
