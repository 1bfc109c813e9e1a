from xofs.cli import main

raise SystemExit(main())
