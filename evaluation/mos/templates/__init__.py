"""Jinja2 templates of the rating page (a package only so that setuptools ships the *.html files)."""
