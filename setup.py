"""Package discovery for the repository's layout: each top-level folder below installs as
``farebox.<folder>`` with every package found under it (everything else is in pyproject.toml)."""

from setuptools import find_packages, setup

#: the folders that are installed; tests/, bench/, hw/, docs/ and examples/ are not
ROOMS = ("cardimage", "protocol", "terminal", "clearing", "tools")

setup(
    packages=[f"farebox.{name}" for name in find_packages(include=[f"{room}*" for room in ROOMS])
              if name.split(".")[0] in ROOMS],
    package_dir={f"farebox.{room}": room for room in ROOMS},
    # the clearing database's schema migrations (read by farebox.clearing.migrate); the web
    # console's templates and its static assets (served from the package, no CDN)
    package_data={"farebox.clearing": ["migrations/*/*.sql"],
                  "farebox.clearing.console": ["templates/*.html", "static/*"]},
)
