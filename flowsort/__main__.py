from flowsort.cli import main

raise SystemExit(main())
