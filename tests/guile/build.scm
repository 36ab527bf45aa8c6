;;; build.scm -- build a derivation through the upstream Guile client.
;;;
;;; guixsvc's own test code, run with the out-of-tree wrapper (see store-ops.scm):
;;;
;;;   NIX_STORE_DIR=/tmp/gb/store GUIX_DAEMON_SOCKET=/tmp/gb/socket \
;;;     /work/guile-client/run.sh tests/guile/build.scm /bin/busybox
;;;
;;; It adds a directory holding the given static busybox (as bin/busybox and
;;; bin/sh) to the store, makes a two-output derivation and a dependent one
;;; with (guix derivations), a fixed-output one, builds them with
;;; build-derivations and checks that the outputs are valid at the paths the
;;; client computed, with the expected contents and references.  Prints
;;; "ok NAME" / "FAIL NAME: ..." and exits 1 on failure.

(use-modules (guix store)
             (srfi srfi-34)
             (guix derivations)
             (gcrypt hash)
             (guix base16)
             (rnrs bytevectors)
             (ice-9 textual-ports)
             (ice-9 format))

(define failures 0)

(define (check name ok? . details)
  (if ok?
      (format #t "ok ~a~%" name)
      (begin
        (set! failures (+ 1 failures))
        (format #t "FAIL ~a: ~s~%" name details))))

(define busybox-binary (cadr (command-line)))

(define (make-tree)
  (let* ((dir (string-append (or (getenv "TMPDIR") "/tmp") "/guile-bb-"
                             (number->string (getpid))))
         (bin (string-append dir "/bin")))
    (mkdir dir)
    (mkdir bin)
    (copy-file busybox-binary (string-append bin "/busybox"))
    (chmod (string-append bin "/busybox") #o755)
    (symlink "busybox" (string-append bin "/sh"))
    dir))

(define (file-contents file)
  (call-with-input-file file get-string-all))

(with-store store
  (set-build-options store #:use-substitutes? #f)
  (let* ((tree (make-tree))
         (bb (add-to-store store "busybox" #t "sha256" tree))
         (sh (string-append bb "/bin/sh"))
         (two (derivation store "two-outputs" sh
                          '("-c" "mkdir $out $doc; echo hello > $out/greeting; echo $out > $doc/where")
                          #:outputs '("out" "doc")
                          #:inputs `((,bb))))
         (dep (derivation store "dependent" sh
                          `("-c" ,(string-append "mkdir $out; cat "
                                                 (derivation->output-path two "doc")
                                                 "/where > $out/copy"))
                          #:inputs `((,bb) (,two "doc"))))
         (payload "fixed contents\n")
         (fixed (derivation store "fixed" sh
                            `("-c" ,(string-append "echo fixed contents > $out"))
                            #:inputs `((,bb))
                            #:hash (sha256 (string->utf8 payload))
                            #:hash-algo 'sha256)))
    (check "build-derivations"
           (build-derivations store (list dep fixed)))
    (let ((out (derivation->output-path two "out"))
          (doc (derivation->output-path two "doc"))
          (dout (derivation->output-path dep)))
      (check "outputs valid at client-computed paths"
             (and (valid-path? store out) (valid-path? store doc)
                  (valid-path? store dout)
                  (valid-path? store (derivation->output-path fixed)))
             out doc dout)
      (check "contents" (string=? (file-contents (string-append dout "/copy"))
                                  (string-append out "\n")))
      (check "references" (equal? (references store dout) (list out))
             (references store dout))
      (check "deriver" (equal? (valid-derivers store out)
                               (list (derivation-file-name two)))
             (valid-derivers store out))
      (check "derivation outputs"
             (equal? (sort (derivation-path->output-paths
                            (derivation-file-name two))
                           (lambda (a b) (string<? (car a) (car b))))
                     `(("doc" . ,doc) ("out" . ,out))))
      (check "rebuild is a no-op" (build-derivations store (list two))))
    (let ((failing (derivation store "failing" sh '("-c" "echo nope; exit 1")
                               #:inputs `((,bb)))))
      (check "failure reported with status 100"
             (guard (c ((store-protocol-error? c)
                        (and (= 100 (store-protocol-error-status c))
                             (string-prefix? "build of "
                                             (store-protocol-error-message c)))))
               (build-derivations store (list failing))
               #f)))))

(exit (if (zero? failures) 0 1))
