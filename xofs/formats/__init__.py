"""The disk and VM image formats XO streams: VHD for disks, XVA for whole VMs."""
