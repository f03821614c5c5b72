"""oneiscsi: OpenNebula storage drivers for iSCSI (libvirt iSCSI and Dell EqualLogic)."""

try:
    from oneiscsi._build import VERSION as __version__, COMMIT as __commit__
except ImportError:  # running from a checkout
    __version__, __commit__ = "0.1.0", "checkout"
