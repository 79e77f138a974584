"""What runs inside the qemu backend's utility VM: its init script and the guest agent."""
