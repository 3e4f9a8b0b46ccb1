from geneve_dp.cli import main

raise SystemExit(main())
