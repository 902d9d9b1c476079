// etcd for the cluster tests: the upstream server's own entry point, built at the version
// k8s.io/kubernetes v1.35 is tested with.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
