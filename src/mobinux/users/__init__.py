"""Users: persistent per-user disks with snapshots, and boot-time login."""
