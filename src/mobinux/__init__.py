"""Mobinux: a diskless-boot server (DHCP, TFTP, HTTP boot, boot configuration)."""

__version__ = "0.1.0"
