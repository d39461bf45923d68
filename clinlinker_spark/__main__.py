from clinlinker_spark.cli import main

raise SystemExit(main())
