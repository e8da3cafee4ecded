from flowtap.cli import main

raise SystemExit(main())
