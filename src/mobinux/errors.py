"""The one exception tree of Mobinux.

::

    MobinuxError
    +-- LocalError               something on this machine is wrong (config, CLI input, files)
    |   +-- ConfigError          a config file or flag value is invalid
    |   +-- InventoryError       a node/image/policy operation cannot be done (says why)
    |   +-- ImageError           an image file cannot be read or built
    +-- RemoteProtocolError      a peer sent something that breaks its protocol
        +-- MalformedPacket      bytes that do not parse (dropped and logged, never fatal)
        +-- PathRefused          a requested path leaves its root or is otherwise unsafe

Foreign exceptions (OSError, sqlite3.Error, ...) are translated to these once,
at the boundary where they are raised; the CLI prints ``str(error)`` as a single
line and exits 1 (2 for usage errors).
"""

from __future__ import annotations


class MobinuxError(Exception):
    """Root of every error Mobinux raises on purpose."""


class LocalError(MobinuxError):
    """Something on this machine is wrong: bad input, bad config, missing file."""


class ConfigError(LocalError):
    """A configuration value (flag or TOML) is invalid."""


class InventoryError(LocalError):
    """A node, image or policy operation cannot be carried out."""


class ImageError(LocalError):
    """An image or initrd cannot be read or built."""


class RemoteProtocolError(MobinuxError):
    """A peer sent bytes that violate its protocol."""


class MalformedPacket(RemoteProtocolError):
    """A packet does not parse; the packet is dropped, the server carries on."""


class PathRefused(RemoteProtocolError):
    """A requested file path is unsafe (escapes the root, NUL, absolute, ...).

    TFTP answers it with ERROR 2 (access violation), HTTP with 403.
    """
