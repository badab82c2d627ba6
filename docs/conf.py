"""Sphinx configuration for the offline docs site (built by docs/build.py from nbdev-processed notebooks)."""
import configparser, sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for _slug

_ini = configparser.ConfigParser()
_ini.read(Path(__file__).resolve().parents[1] / "settings.ini")
_s = _ini["DEFAULT"]

project = _s["title"]
author = _s["author"]
copyright = _s["copyright"]
release = version = _s["version"]

extensions = ["myst_nb"]
nb_execution_mode = "off"  # docs/build.py executed the notebooks already (execnb, like nbdev_test)
nb_render_markdown_format = "myst"  # show_doc's markdown has tables and `{target=...}` link attributes
nb_merge_streams = True
nb_code_prompt_show = "Exported source"  # docs/build.py folds only exported code (nbdev's `#| exports` look)
nb_code_prompt_hide = "Hide exported source"
myst_enable_extensions = ["colon_fence", "attrs_inline", "dollarmath"]
myst_heading_anchors = 4
myst_heading_slug_func = "_slug.pandoc_slug"  # nbdev links to `page.html#class.method`, as Pandoc names anchors
exclude_patterns = ["**.ipynb_checkpoints"]
suppress_warnings = ["myst.header"]  # show_doc's `###` headings inside cell outputs

html_theme = "furo"
html_title = project
html_static_path = ["_static"]
html_css_files = ["flux2_kit.css"]
html_show_sourcelink = False
html_copy_source = False
