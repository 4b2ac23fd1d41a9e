// Command pstest serves Google's in-memory Pub/Sub fake (cloud.google.com/go/pubsub/pstest)
// over gRPC until it is killed. Used by the test-suite and for local runs:
//
//	pstest -host 127.0.0.1 -port 8085   (port 0 = any free port)
//
// It prints "listening on HOST:PORT" once it accepts connections. pstest.NewServer()
// always binds its own random port; we serve the same fake state on the chosen
// address too, so a fixed port works with the old Debian package as well.
package main

import (
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"strconv"
	"syscall"

	"cloud.google.com/go/pubsub/pstest"
	pb "google.golang.org/genproto/googleapis/pubsub/v1"
	"google.golang.org/grpc"
)

func main() {
	defaultPort, _ := strconv.Atoi(os.Getenv("PSTEST_PORT"))
	host := flag.String("host", "127.0.0.1", "address to listen on")
	port := flag.Int("port", defaultPort, "port to listen on (0: any free port; env PSTEST_PORT)")
	flag.Parse()

	fake := pstest.NewServer()
	defer fake.Close()

	lis, err := net.Listen("tcp", net.JoinHostPort(*host, strconv.Itoa(*port)))
	if err != nil {
		fmt.Fprintf(os.Stderr, "pstest: listen: %v\n", err)
		os.Exit(1)
	}
	srv := grpc.NewServer()
	pb.RegisterPublisherServer(srv, &fake.GServer)
	pb.RegisterSubscriberServer(srv, &fake.GServer)
	go func() {
		if err := srv.Serve(lis); err != nil {
			fmt.Fprintf(os.Stderr, "pstest: serve: %v\n", err)
			os.Exit(1)
		}
	}()
	fmt.Printf("listening on %s\n", lis.Addr().String())

	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	<-sig
	srv.Stop()
}
