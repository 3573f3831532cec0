from mobinux.cli.main import main

raise SystemExit(main())
