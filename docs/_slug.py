"Heading anchors as Pandoc (so Quarto, so nbdev's doc links) writes them: `### Panel.show` -> `#panel.show`."
import re


def pandoc_slug(title: str) -> str:
    "Pandoc's auto_identifiers: keep letters, digits, `_-.`; spaces to hyphens; lowercase; start at the first letter."
    s = re.sub(r"[^\w\s.-]", "", title.strip().lower())
    s = re.sub(r"\s+", "-", s)
    return re.sub(r"^[^a-z]+", "", s) or "section"
