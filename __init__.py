"""memlayers: memory layers at scale, as a scaling-law study platform.

The repository root is this package; platform/, models/, kernels/ and dashboards/ are
namespace subpackages (no __init__.py) so that `platform` never shadows the standard library.
"""

__version__ = "0.1.0"
