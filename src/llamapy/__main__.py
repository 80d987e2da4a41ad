from llamapy.cli.main import main

raise SystemExit(main())
